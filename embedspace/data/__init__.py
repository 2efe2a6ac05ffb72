"""embedspace's input data: shipped datasets, one `get_source` entry point, grain pipelines.

```python
from embedspace import data
source, info = data.get_source("embedded_fashion_mnist", split="train")  # built on first use
loader = data.ssl_loader(source, global_batch_size=256, seed=0, image_size=28)
batch = next(iter(loader))  # {"view1", "view2": float32 [256, 28, 28, 1], "label": int32 [256]}
```

Modules: `idx` (idx file reader), `builders` (TFDS array_record builders of the local datasets
and their fixed split), `sources` (`get_source`), `augment` (numpy view augmentation),
`pipeline` (grain loaders for training and evaluation).
"""

from embedspace.data.augment import AugmentConfig
from embedspace.data.builders import LOCAL_NAMES, default_data_dir, prepare, stratified_split
from embedspace.data.idx import IdxFormatError, read_idx_images, read_idx_labels
from embedspace.data.pipeline import eval_batches, eval_loader, ssl_loader
from embedspace.data.sources import DataInfo, ImageSource, get_source, normalization

__all__ = [
    "AugmentConfig",
    "DataInfo",
    "IdxFormatError",
    "ImageSource",
    "LOCAL_NAMES",
    "default_data_dir",
    "eval_batches",
    "eval_loader",
    "get_source",
    "normalization",
    "prepare",
    "read_idx_images",
    "read_idx_labels",
    "ssl_loader",
    "stratified_split",
]
