"""The model: configuration, vision towers, patch info mining, image processing, and checkpoint loading."""
