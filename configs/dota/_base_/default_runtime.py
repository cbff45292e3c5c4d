_base_ = ['mmrotate::_base_/default_runtime.py', '../../_base_/flora_runtime.py']
