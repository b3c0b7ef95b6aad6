"""`bash bench/gpu.sh` / `python -m bench.gpu`: real-size random-weight training steps on one CUDA GPU
(SD1.5 512 px and SDXL 1024 px with ours and diffusers' reference scripts, a Flux-class transformer
at 1024 px with our core in bf16 and fp8), each beside the memory estimator's prediction of the same
setting, with it/s, peak VRAM (torch and nvidia-smi) and MFU. The orchestrator (plan, cards, smi,
table, runner, cli) uses the standard library only, as bench/run.py does; torch runs in children."""
