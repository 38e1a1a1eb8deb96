"""The single-device model: the DiT and its attention, the flow-matching maths, the batch contract,
and ``BindWeaveModel`` (DiT + VAE + conditioners), the one object training and sampling call.

Nothing here knows of Lightning, parallelism or checkpoint formats."""


def __getattr__(name: str):
    # ``bindweave.model`` was the module holding BindWeaveModel: keep ``bindweave.model.BindWeaveModel``
    # working without importing the conditioners whenever ``bindweave.model.dit`` is imported.
    if name in {"BindWeaveModel"}:
        from bindweave.model import bindweave_model

        return getattr(bindweave_model, name)
    raise AttributeError(f"module 'bindweave.model' has no attribute {name!r}")
