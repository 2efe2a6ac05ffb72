"""Defaults the config files in `configs/` start from: plain ml_collections values, no logic.

`configs/*.py` import only this package, so a config runs from any directory
(`python -m embedspace.main --config=/path/to/checkout/configs/vicreg.py:smoke`).
`ssl` holds the image self-supervised defaults, `multimodal` those of CLIP/ImageBind/DeCUR and
the `:variant` parser the interface configs share.
"""
