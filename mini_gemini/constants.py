"""Constants shared by the prompt, model and engine code (values as the official MGM code uses them)."""

IMAGE_TOKEN = "<image>"          # placeholder in prompt text, one per image
IMAGE_TOKEN_INDEX = -200         # its id in token sequences before visual tokens are spliced in
IGNORE_INDEX = -100              # label value that the loss ignores
GEN_TAG = " <GEN>"               # appended to a user turn to ask for an image (official demo)
IMAGE_PROMPT_OPEN, IMAGE_PROMPT_CLOSE = "<h>", "</h>"  # the LLM writes its SDXL prompt between these
DEFAULT_SDXL = "stabilityai/stable-diffusion-xl-base-1.0"  # the official demo's image generator
