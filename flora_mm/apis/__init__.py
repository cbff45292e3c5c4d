"""What the command-line tools compute, as library functions (OpenMMLab's ``mmdet/apis``).

``tools/*.py`` parse arguments and call one function from here.
"""
