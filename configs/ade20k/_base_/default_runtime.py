_base_ = ['mmseg::_base_/default_runtime.py', '../../_base_/flora_runtime.py']
