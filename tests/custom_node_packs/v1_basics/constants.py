SUFFIX = "!"
CATEGORY = "pack/basics"
