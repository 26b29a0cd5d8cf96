"""Dataset preparation: official downloads -> the prepared layout that training reads (`python -m prepare`).

kvasir.py and nci_isbi.py write ROOT/images/, ROOT/masks/, ROOT/train.txt, ROOT/test.txt; boxes.py writes box
pseudo-masks as gaze maps; synthetic.py makes the demo's polyp-like data with simulated gaze."""
