"""`python -m bench memory`: the peak GPU memory of one LoRA + prior-preservation step at real sizes,
predicted by running the core's training step over fake tensors (shapes and dtypes, no data), and
checked against the same step measured on CPU on reduced models.

Modules, one job each: `tracker` (counts live tensor storages and the peak), `fake` (meta-built
models made fake, CUDA autocast's fp32 norms), `frozen` (the host flow path's frozen Linears, fp8
storage), `architectures` (real and reduced models), `flux_backend` (a Backend over diffusers'
Flux transformer), `settings` (the memory levers), `step` (the trainer's step), `estimate`,
`selfcheck`, `report`, `cli`."""
