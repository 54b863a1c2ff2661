"""The names of the fusion models (`--fusion`'s choices): light, below the model that builds them, the checkpoint
rules that check them and the classify plug-in that offers them."""

FUSIONS = ("concat", "gated", "attention", "transformer", "bilinear", "linear")  # checked in every checkpoint
TOKEN_FUSIONS = ("attention", "transformer")  # fusions that read token sequences, not one vector per modality
