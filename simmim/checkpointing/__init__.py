"""What a run writes and reads back: run folders and their claims (`runs`), the weight exports and safe checkpoint
reading (`exports`), and everything read from files this run did not write (`untrusted`: hyper-parameters, shard
folders, restored checkpoint paths, links in run folders, saved configs), checked and bounded before use."""
