"""Training: the objective (noise schedule, targets, the prior-preservation loss), the loop, its
checkpoints and the Accelerator it runs on."""
