from fusion.train import command_line

command_line()
