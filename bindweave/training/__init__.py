"""The LightningModule: builds the model, the flow-matching loss with condition dropout, optimisers
and checkpoint filtering. Everything else it uses lives in lower layers."""
