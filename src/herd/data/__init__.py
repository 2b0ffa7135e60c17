"""Training data: the built-in English corpus, sequence packing with document masking, synthetic image-text and
long-context tasks, and readers for users' own files.

- `herd.data.corpus`: ~27 MB of public-domain / permissive English text shipped (xz) inside the package.
- `herd.data.packing`: `Packer`, a resumable, rank-sliced iterator of packed (B, T) batches with doc ids.
- `herd.data.synthetic`: shapes scenes with captions, questions and boxes; passkey and key-value documents.
- `herd.data.sources`: text files, JSONL, image-text JSONL, Hugging Face datasets.

Submodules are imported on use (`from herd.data.packing import Packer`), so importing one does not pull in the
others (PIL for the scenes, the corpus files).
"""
