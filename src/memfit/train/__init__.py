"""`memfit train`: the built-in recipes, their YAML configs and the training loop with a memory monitor."""
