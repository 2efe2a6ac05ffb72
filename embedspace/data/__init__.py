"""embedspace's input data: shipped datasets, one `get_source` entry point, grain pipelines.

```python
from embedspace import data
source, info = data.get_source("embedded_fashion_mnist", split="train")  # 60,000 images
loader = data.ssl_loader(source, global_batch_size=256, seed=0, image_size=28)
batch = next(iter(loader))  # {"view1", "view2": float32 [256, 28, 28, 1], "label": int32 [256]}
```

Modules: `idx` (idx file reader), `shipped` (the datasets in `assets/`: Fashion-MNIST, train
60,000 / test 10,000, and MNIST's test images re-split 8,000 / 2,000), `sources` (`get_source`),
`augment` (numpy view augmentation), `pipeline` (grain loaders for training: two views or
multi-crop; and for evaluation).
"""

from embedspace.data.augment import AugmentConfig
from embedspace.data.idx import IdxFormatError, read_idx_images, read_idx_labels
from embedspace.data.pipeline import (ResumableBatches, eval_batches, eval_loader,
                                      multicrop_loader, ssl_loader)
from embedspace.data.shipped import SHIPPED_NAMES, stratified_split
from embedspace.data.sources import (DataInfo, ImageSource, default_data_dir, get_source,
                                     normalization)

__all__ = [
    "AugmentConfig",
    "DataInfo",
    "IdxFormatError",
    "ImageSource",
    "ResumableBatches",
    "SHIPPED_NAMES",
    "default_data_dir",
    "eval_batches",
    "eval_loader",
    "get_source",
    "multicrop_loader",
    "normalization",
    "read_idx_images",
    "read_idx_labels",
    "ssl_loader",
    "stratified_split",
]
