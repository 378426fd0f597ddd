"""The resident-set high-water growth of one call in this process (Linux /proc)."""


def status_bytes(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))


def peak_extra_bytes(function):
    """Reset the high-water mark (clear_refs "5"), call `function`, return how far the
    resident set's peak rose above its size before the call."""
    before = status_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    function()
    return status_bytes("VmHWM:") - before
