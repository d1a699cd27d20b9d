local x = nil
local y = x.z
