"""The Lightning glue: ``DWFCallback`` (hook glue over ``TrainingRun``), its arguments, guards, checkpoint I/O, the
fit-end outputs and the read-only results."""
