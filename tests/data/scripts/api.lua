-- Exercises the msg, hl7 and json API; reports what it saw as a JSON route.
local started = false
function on_start()
  started = true
end

function on_message(msg, ctx)
  local r = {}
  r.started = started
  r.channel = ctx.channel
  r.peer = ctx.peer
  r.message_id = ctx.message_id
  r.type = msg:type()
  r.family = msg:get("PID-5.1")
  r.given = msg["PID-5.2"]
  r.mrn = msg:get("PID-3[1].1")
  r.ssn = msg:get("PID-3[2].1")
  r.reps = msg:repetitions("PID-3")
  r.reps_empty = msg:repetitions("PID-4")
  r.reps_missing_seg = msg:repetitions("ZZZ-1")
  r.empty = msg:get("PID-2")
  r.missing_is_nil = msg:get("ZZZ-1") == nil
  r.missing_index_is_nil = msg["OBX-5"] == nil
  r.raw_pid3 = msg:raw("PID-3[1]")
  r.not_a_path = msg.whatever == nil
  r.pid_count = msg:count("PID")
  r.nseg = 0
  local names = {}
  for i, name in msg:segments() do
    r.nseg = i
    names[#names + 1] = name
  end
  r.names = table.concat(names, ",")

  msg:set("PID-5.1", "O'BRIEN|^&")
  r.after_set = msg:get("PID-5.1")
  r.after_set_raw = msg:raw("PID-5.1")
  msg["ZPI-1"] = 42
  msg:set("ZPI-2.3", 1.5)
  r.zpi = msg:raw("ZPI")
  msg["ZPI-2"] = nil
  r.zpi_after_delete = msg:raw("ZPI")
  msg:delete("PV2")
  r.pv2_gone = msg:count("PV2") == 0
  msg:add_segment("ZAD|added\r")
  msg:insert_segment(2, "ZIN|inserted")
  r.second = msg:raw("ZIN-1")
  local count_before = msg:count("ZIN")
  msg:remove_segment(2)
  r.zin_removed = count_before == 1 and msg:count("ZIN") == 0
  r.last = select(2, (function()
    local last
    for i, n in msg:segments() do last = n end
    return nil, last
  end)())

  -- hl7.parse / hl7.new / clone
  local m2, err = hl7.parse("MSH|^~\\&|A|B|C|D|20240101||ORU^R01|X1|P|2.5\rOBX|1|TX|||hello\\T\\world")
  r.parse_err = err
  r.m2_obx5 = m2:get("OBX-5")
  r.m2_type = m2:type()
  local bad, perr = hl7.parse("garbage")
  r.bad_is_nil = bad == nil
  r.bad_err = type(perr)
  local n = hl7.new("2.5.1")
  n:set("MSH-9", "ACK")
  n["MSA-1"] = "AA"
  r.new_text = n:encode()
  r.new_tostring = tostring(n) == n:encode()
  local c = msg:clone()
  c:set("PID-5.1", "CLONE")
  r.clone_independent = msg:get("PID-5.1") ~= "CLONE" and c:get("PID-5.1") == "CLONE"

  -- time
  r.ts = hl7.timestamp("20240315083000+0100")
  r.ts_utc = hl7.timestamp("20240315073000")
  r.ts_day = hl7.timestamp("20240315")
  r.ts_frac = hl7.timestamp("20240315073000.5")
  r.ts_bad = hl7.timestamp("2024131") == nil and hl7.timestamp("20240230") == nil
  r.fmt = hl7.format_time(1710487800)
  r.fmt_off = hl7.format_time(1710487800, 60)
  r.now_len = #hl7.now()

  -- json
  local doc = json.decode('{"a":[1,2,{"b":null}],"s":"x\\u00e9","t":true,"f":1.5,"e":[]}')
  r.json_null = doc.a[3].b == json.null
  r.json_s = doc.s
  r.json_roundtrip = json.encode(doc)
  r.json_bad = select(2, json.decode("{bad"))
  r.json_empty_obj = json.encode({})
  r.json_empty_arr = json.encode(json.array())
  ctx:route("report", r)
  ctx:log("info", "done", 1, true)
end
