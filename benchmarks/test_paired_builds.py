"""paired_builds.py's renaming: the two builds it loads side by side must share no
operator namespace and no C++ symbol, or one side would run the other's kernels; and
its routing of the modules' operators to one side."""
import re
import types

import pytest
from paired_builds import REPO, export_sources, paired_times, renamed, routed, speed_up


def test_renamed_moves_both_namespaces():
    source = ("namespace fastnl {\nTensor f();\n}  // namespace fastnl\n"
              "TORCH_LIBRARY(fastnl_cpp, m) { m.def(\"f() -> Tensor\", &fastnl::f); }\n"
              "TORCH_LIBRARY_IMPL(fastnl_cpp, CPU, m) { m.impl(\"f\", &fastnl::f); }\n"
              "double fastnl_cpp_rate();\n")
    assert renamed(source, "new") == (
        "namespace fastnl_new {\nTensor f();\n}  // namespace fastnl_new\n"
        "TORCH_LIBRARY(fastnl_cpp_new, m) { m.def(\"f() -> Tensor\", &fastnl_new::f); }\n"
        "TORCH_LIBRARY_IMPL(fastnl_cpp_new, CPU, m) { m.impl(\"f\", &fastnl_new::f); }\n"
        "double fastnl_cpp_rate();\n")


@pytest.mark.parametrize("revision", ["work", "HEAD"])
def test_exported_sources_keep_nothing_of_the_original_names(tmp_path, revision):
    if revision == "HEAD" and not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    export_sources(revision, "base", tmp_path)
    expected = {"register.cpp", "softmax_forward.cpp", "softmax_backward.cpp", "tile_math.h"}
    assert expected <= {path.name for path in tmp_path.iterdir()}
    text = "\n".join(path.read_text() for path in tmp_path.iterdir())
    assert "TORCH_LIBRARY(fastnl_cpp_base," in text and "TORCH_LIBRARY_IMPL(fastnl_cpp_base," in text
    assert not re.search(r"\bnamespace fastnl\b|\bfastnl::|\(fastnl_cpp,", text)


def test_paired_times_alternate_which_side_goes_first():
    calls = []
    times = paired_times({"base": lambda: calls.append("base"), "new": lambda: calls.append("new")}, rounds=4)
    assert calls == ["base", "new", "new", "base", "base", "new", "new", "base"]
    assert [len(seconds) for seconds in times.values()] == [4, 4]
    assert speed_up({"base": [2.0, 3.0, 4.0], "new": [1.0, 1.0, 4.0]}) == 2.0


def test_routed_points_the_operators_at_one_side_and_back():
    """The stage comparison runs the modules on one side's operators: inside `routed`
    the names are that side's, afterwards the namespace's own again (a name it had not
    looked up yet is removed, so that it resolves as before), after an error too."""
    namespace, side = types.SimpleNamespace(forward="main forward"), types.SimpleNamespace(forward="f", backward="b")
    with routed(namespace, side, ["forward", "backward"]):
        assert (namespace.forward, namespace.backward) == ("f", "b")
    assert vars(namespace) == {"forward": "main forward"}
    with pytest.raises(RuntimeError), routed(namespace, side, ["forward", "backward"]):
        raise RuntimeError("a failed step")
    assert vars(namespace) == {"forward": "main forward"}
