"""The embedded default model that ships with the package (`model`: where its files are, its CLIP
tokenizer) and the synthetic toy world it was trained on and is evaluated in (`toyworld`)."""
