print('never'
x = 
