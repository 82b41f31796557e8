"""Bulk work: prompt files × seeds (`txt2img`), folders of images (`img2img`) and whole videos (`stylize`), on
this machine or on a Ray cluster.

A job is planned on the driver (`plan`), rendered by workers that hold a loaded model (`work`: in this
process, or one Ray actor per device: `cluster`), and committed by the driver alone (`run`): each output is
written atomically and then recorded in the out folder's manifest (`manifest`), so a rerun after Ctrl-C,
SIGTERM or a crash skips exactly what is done.
"""
