"""ECG basics, each defined once: the time base and shapes (`shapes`), lead names and orders (`leads`),
resampling (`resample`), units (`units`), QRS detection and heart rate (`heart_rate`)."""
