"""Reading images, for both stages and the evaluation tools: decoding and listing (`images`), the file index every
command finds its images through (`index`), shard sets for many nodes and object storage and their converter
(`shards`, `convert`), labelled class folders and their fixed split (`folders`), the built-in
digits and photo crops (`builtin`), the data loaders, their workers and the resumable training loader (`loaders`),
and what the trainer watches in its data: the bad-image limit and the wait for each batch (`watch`). Nothing here
imports a stage."""
