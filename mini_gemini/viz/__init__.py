"""Pictures of what the model did: mining heatmaps laid over the photo."""
