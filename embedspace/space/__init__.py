"""Using a trained space: embed raw images with a loaded encoder (`image`), read any input
(`inputs`), store embeddings (`store`), search them exactly (`search`) or export a faiss index
(`faiss_index`). `embedspace.load(workdir)` is the way in."""
