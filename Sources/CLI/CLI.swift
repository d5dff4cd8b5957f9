import VMM
