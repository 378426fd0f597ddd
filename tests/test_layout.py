"""The layout: the application (fastnl/app) uses the library only through its named
surface, and the library never imports the application, so either can change inside
without the other noticing (docs/design.md, "Layout")."""
import ast
from pathlib import Path

import fastnl

PACKAGE = Path(fastnl.__file__).parent
# library module -> the names the application may import from it (None: any)
SURFACE = {
    "fastnl": set(fastnl.__all__) | {"backends"},
    "fastnl.models": None,
    "fastnl.backends": {"resolve", "bfloat16_path"},
    "fastnl.reference": {"normalized_affinity"},
    "fastnl.modules": {"MODES"},
    "fastnl._probe": {"captured_forward"},
}
# the library's command shims that hand over to the application
SHIMS = {"train.py", "reproduce.py", "spectrum"}


def _imports(path):
    """(module, name or None) for each import in a file, and the attributes it reads of `backends`."""
    tree = ast.parse(path.read_text())
    found, attributes = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastnl"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("fastnl")]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "backends":
            attributes.add(node.attr)
    return found, attributes


def test_application_uses_only_the_library_surface():
    for path in sorted((PACKAGE / "app").rglob("*.py")):
        found, backend_attributes = _imports(path)
        for module, name in found:
            if module.startswith("fastnl.app"):
                continue
            assert module in SURFACE, f"{path.relative_to(PACKAGE)} imports {module}, not in the library's surface"
            allowed = SURFACE[module]
            assert allowed is None or name in allowed, f"{path.relative_to(PACKAGE)} imports {module}.{name}"
        assert backend_attributes <= SURFACE["fastnl.backends"], f"{path.name} uses backends.{backend_attributes}"


def test_library_does_not_import_the_application():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in SHIMS or relative.parts[0] == "app":
            continue
        found, _ = _imports(path)
        assert not [m for m, _ in found if m.startswith("fastnl.app")], f"{relative} imports the application"
