"""Continual-learning methods for class-incremental scenarios (`scenario=class_incremental`): the stage
hooks the scenario calls between fits (`stage_hooks.py`), the prototype classifiers SimpleCIL and APER
(`prototypes.py`), and the terms EWC (`ewc.py`) and the continual LwF (`cil_lwf.py`)."""
