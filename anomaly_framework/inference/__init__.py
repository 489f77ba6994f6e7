"""Using a saved run: rebuilding it from its checkpoint, and scoring new images with it."""
