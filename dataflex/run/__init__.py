"""What the recipes in launch/ need around the loop: the run folder and its outputs (`outputs`), launching
ranks and settling a config (`launching`, `config`), checkpoints and resume (`checkpoints`), reference models
of earlier runs (`reference`) and fault injection for the tests (`faults`)."""
