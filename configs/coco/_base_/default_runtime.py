_base_ = ['mmdet::_base_/default_runtime.py', '../../_base_/flora_runtime.py']
