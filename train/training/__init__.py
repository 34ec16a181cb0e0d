"""The parts every training binary shares: its common flags (`flags`), the run's set-up
from them (`from_flags`), the optimizer (`optimizer`, `schedules`), the loss (`losses`),
the recorded run configuration (`run_config`) and the training loop (`loop`)."""
