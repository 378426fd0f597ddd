"""One forward that records what named submodules receive or return, changing nothing.

insert_nonlocal reads each place's output shape from it, the spectrum tool the inputs
of the nonlocal modules.
"""
import torch


def captured_forward(model, example_input, modules, *, inputs=False):
    """{name: the first input (inputs=True) or the output of module} for each name, module
    in `modules`, from one forward of `example_input` in eval mode without gradients (the
    model's mode is put back); a module that did not run is missing from the result."""
    captured, handles = {}, []
    for name, module in modules.items():
        if inputs:
            def record(module, args, name=name):
                captured[name] = args[0].detach()
            handles.append(module.register_forward_pre_hook(record))
        else:
            def record(module, args, output, name=name):
                captured[name] = output
            handles.append(module.register_forward_hook(record))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return captured
