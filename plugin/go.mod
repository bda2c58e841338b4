module ambient-cni

go 1.19
