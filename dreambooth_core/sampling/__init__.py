"""Looking at results: the prompt sets that show what DreamBooth is for, and grids of samples
(`prompts`)."""
