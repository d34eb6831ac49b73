"""flaxlm training: state, optimizer, losses, the train step and (later) the shared loop."""
