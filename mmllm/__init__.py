"""mmllm: fine-tune pretrained language models together with image and audio inputs."""

__version__ = "0.1.0"
