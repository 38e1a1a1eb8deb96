"""The synthetic sprites task: scenes with subjects, prompts and references (``scenes``), its
evaluation (``evaluate``) and the ``bindweave eval`` command (``cli``). See docs/sprites.md."""
