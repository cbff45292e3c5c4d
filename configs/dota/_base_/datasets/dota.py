# mmrotate's DOTA-v1.0 data (1024x1024 single-scale split patches, data/split_ss_dota).
_base_ = 'mmrotate::_base_/datasets/dota.py'
