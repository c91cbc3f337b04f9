"""turtle-reid: contrastive re-identification of individual animals photographed from several views."""

__version__ = "0.1.0"
