"""turtle-reid: contrastive re-identification of individual animals photographed from several views."""

import os

# albumentations asks PyPI for its latest version whenever it is imported: a network call on every command (up to
# 2 s, and a warning where there is no network, as at a field station). A user's own setting is kept.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
