"""Class images for prior preservation: made once per model, class prompt and sampler settings, cached
on disk with a manifest, reused and topped up (`cache`)."""
