"""Plain math and parametrizations, no Lightning: every formula (``functional``), the Hadamard parametrization, the
DWF init, ``factorize_``/``select_tensors`` and ``collapse_``/``collapse_state_dict``."""
