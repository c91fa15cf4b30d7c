"""Running a recipe: its plan (plan.py), its parts (parts.py), the loop (loop.py) and one optimizer step
(step.py); what it writes as it goes (logbook.py), where it starts (resume.py), its checkpoints
(checkpoints.py), state (state.py), stop requests (stops.py), folder (folder.py) and outputs
(outputs.py); how the model is spread over processes (sharding.py), the optimizer and schedule
(optim.py), and what a step costs (flops.py, memory.py)."""
from .loop import Trainer
from .parts import close_processes
from .plan import Plan, check_batch, make_plan, mixed_precision

__all__ = ["Plan", "Trainer", "check_batch", "close_processes", "make_plan", "mixed_precision"]
