"""Sampling a trained model: the sampler, ``BindWeavePipeline``, loading trained models, prediction
requests and the files written for them."""
