"""What the commands use besides the library: synthetic checkpoints and saliency, a
checkpoint's description, progress bars, the Ray Jobs client."""
