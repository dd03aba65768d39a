"""What users send: image decoding with its limits (one place), and text read from images (OCR)."""
