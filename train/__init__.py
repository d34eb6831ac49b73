"""flaxlm training: state, optimizer, losses, the train step, the shared loop and the stages."""
