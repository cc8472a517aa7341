// Slicefab N x N AXI4-Stream crossbar with an AXI4-Lite register port.
//
// Register semantics: docs/abi/registers.md (generated from rtl/regmap/slicefab_xbar.rdl);
// datapath: firmware/fabric/model.py, the cycle-level reference this module matches
// cycle for cycle (docs/rtl.md has the mapping and the block diagram). In one cycle:
//
//  1. refill    every input adds its rate to its token bucket, capped at its burst;
//  2. head      an input with no packet in flight looks at its head flit under its ACTIVE
//               configuration: a forbidden output or key drops the packet whole (the input
//               drains it, CNT_DROPS + 1); a permitted packet requests its output when the
//               bucket holds the tokens for the first flit, else the input stalls;
//  3. arbitrate every free output grants one requester by weighted round-robin;
//  4. transfer  every input with a packet in flight (or granted now) moves one flit;
//  5. adopt     at the clock edge, an input with a staged commit and no packet in flight
//               after this cycle takes the staged configuration into service.
//
// The model has no back-pressure and whole packets queued at the inputs; here an output
// whose register is full grants nobody and holds its packet, and an input whose tvalid
// drops inside a packet waits. Neither is counted as a stall (CNT_STALLS counts token
// stalls only).
//
// tdest names the output (6 bits: the map's 64 ports), tuser the protection key (4 bits:
// the map's 16 keys); tdata, tkeep, tlast, tid, tdest and tuser are carried to the output.
`timescale 1ns / 1ps
`default_nettype none

module slicefab_xbar #(
    parameter integer N_PORTS = 4,       // 1..64
    parameter integer DATA_WIDTH = 64,   // 8..2040, a multiple of 8
    parameter integer KEEP_WIDTH = DATA_WIDTH / 8,
    parameter integer ID_WIDTH = 8,
    parameter integer DEST_WIDTH = 6,    // fixed by the register map (MAX_PORTS = 64)
    parameter integer USER_WIDTH = 4,    // fixed by the register map (16 keys)
    parameter integer N_KEYS = 16,       // 1..16
    parameter integer AXIL_ADDR_WIDTH = 13
) (
    input  wire                             clk,
    input  wire                             rst,

    input  wire [N_PORTS*DATA_WIDTH-1:0]    s_axis_tdata,
    input  wire [N_PORTS*KEEP_WIDTH-1:0]    s_axis_tkeep,
    input  wire [N_PORTS-1:0]               s_axis_tvalid,
    output wire [N_PORTS-1:0]               s_axis_tready,
    input  wire [N_PORTS-1:0]               s_axis_tlast,
    input  wire [N_PORTS*ID_WIDTH-1:0]      s_axis_tid,
    input  wire [N_PORTS*DEST_WIDTH-1:0]    s_axis_tdest,
    input  wire [N_PORTS*USER_WIDTH-1:0]    s_axis_tuser,

    output wire [N_PORTS*DATA_WIDTH-1:0]    m_axis_tdata,
    output wire [N_PORTS*KEEP_WIDTH-1:0]    m_axis_tkeep,
    output wire [N_PORTS-1:0]               m_axis_tvalid,
    input  wire [N_PORTS-1:0]               m_axis_tready,
    output wire [N_PORTS-1:0]               m_axis_tlast,
    output wire [N_PORTS*ID_WIDTH-1:0]      m_axis_tid,
    output wire [N_PORTS*DEST_WIDTH-1:0]    m_axis_tdest,
    output wire [N_PORTS*USER_WIDTH-1:0]    m_axis_tuser,

    input  wire [AXIL_ADDR_WIDTH-1:0]       s_axil_awaddr,
    input  wire [2:0]                       s_axil_awprot,
    input  wire                             s_axil_awvalid,
    output wire                             s_axil_awready,
    input  wire [31:0]                      s_axil_wdata,
    input  wire [3:0]                       s_axil_wstrb,
    input  wire                             s_axil_wvalid,
    output wire                             s_axil_wready,
    output wire [1:0]                       s_axil_bresp,
    output wire                             s_axil_bvalid,
    input  wire                             s_axil_bready,
    input  wire [AXIL_ADDR_WIDTH-1:0]       s_axil_araddr,
    input  wire [2:0]                       s_axil_arprot,
    input  wire                             s_axil_arvalid,
    output wire                             s_axil_arready,
    output wire [31:0]                      s_axil_rdata,
    output wire [1:0]                       s_axil_rresp,
    output wire                             s_axil_rvalid,
    input  wire                             s_axil_rready
);
    localparam integer MAX_PORTS = 64;
    localparam integer DATA_BYTES = DATA_WIDTH / 8;
    localparam integer SEL_WIDTH = 6;                // tdest, as the register map has it
    localparam integer IDX_WIDTH = (N_PORTS > 1) ? $clog2(N_PORTS) : 1;  // a port number
    localparam [IDX_WIDTH-1:0] LAST_PORT = IDX_WIDTH'(N_PORTS - 1);
    localparam integer TOKEN_SHIFT = 16;             // TB_RATE is 16.16 bytes per cycle
    localparam integer TOKEN_WIDTH = 24 + TOKEN_SHIFT; // up to TB_BURST.burst bytes
    localparam integer CHAN_WIDTH = DATA_WIDTH + KEEP_WIDTH + 1 + ID_WIDTH + DEST_WIDTH
                                    + USER_WIDTH;
    localparam [MAX_PORTS-1:0] OUT_EXISTS =
        (N_PORTS >= MAX_PORTS) ? {MAX_PORTS{1'b1}} : ((64'd1 << N_PORTS) - 64'd1);
    localparam [15:0] KEY_EXISTS = (N_KEYS >= 16) ? 16'hFFFF : ((16'd1 << N_KEYS) - 16'd1);
    // one input's configuration, packed so that a commit stages and adopts it whole:
    // {perm, keys, weight (0 already counted as 1), rate, burst, enable, generation}
    localparam integer CFG_WIDTH = MAX_PORTS + 16 + 8 + 32 + 24 + 1 + 16;
    localparam [CFG_WIDTH-1:0] CFG_RESET =
        {{MAX_PORTS{1'b0}}, 16'd0, 8'd1, 32'd0, 24'd0, 1'b0, 16'd0};

    // ------------------------------------------------------------------------------------
    // register block (generated) and its AXI4-Lite front end
    // ------------------------------------------------------------------------------------
    wire        cpuif_req, cpuif_req_is_wr;
    wire [12:0] cpuif_addr;
    wire [31:0] cpuif_wr_data, cpuif_wr_biten, cpuif_rd_data;
    wire        cpuif_req_stall_wr, cpuif_req_stall_rd;
    wire        cpuif_rd_ack, cpuif_rd_err, cpuif_wr_ack, cpuif_wr_err;

    slicefab_xbar_axil #(
        .N_PORTS(N_PORTS),
        .N_KEYS(N_KEYS),
        .ADDR_WIDTH(AXIL_ADDR_WIDTH)
    ) axil (
        .clk(clk), .rst(rst),
        .s_axil_awaddr(s_axil_awaddr), .s_axil_awprot(s_axil_awprot),
        .s_axil_awvalid(s_axil_awvalid), .s_axil_awready(s_axil_awready),
        .s_axil_wdata(s_axil_wdata), .s_axil_wstrb(s_axil_wstrb),
        .s_axil_wvalid(s_axil_wvalid), .s_axil_wready(s_axil_wready),
        .s_axil_bresp(s_axil_bresp), .s_axil_bvalid(s_axil_bvalid),
        .s_axil_bready(s_axil_bready),
        .s_axil_araddr(s_axil_araddr), .s_axil_arprot(s_axil_arprot),
        .s_axil_arvalid(s_axil_arvalid), .s_axil_arready(s_axil_arready),
        .s_axil_rdata(s_axil_rdata), .s_axil_rresp(s_axil_rresp),
        .s_axil_rvalid(s_axil_rvalid), .s_axil_rready(s_axil_rready),
        .cpuif_req(cpuif_req), .cpuif_req_is_wr(cpuif_req_is_wr), .cpuif_addr(cpuif_addr),
        .cpuif_wr_data(cpuif_wr_data), .cpuif_wr_biten(cpuif_wr_biten),
        .cpuif_req_stall_wr(cpuif_req_stall_wr), .cpuif_req_stall_rd(cpuif_req_stall_rd),
        .cpuif_rd_ack(cpuif_rd_ack), .cpuif_rd_err(cpuif_rd_err),
        .cpuif_rd_data(cpuif_rd_data), .cpuif_wr_ack(cpuif_wr_ack),
        .cpuif_wr_err(cpuif_wr_err)
    );

    wire        ctrl_commit, ctrl_clear_counters;
    wire [15:0] gen_committed, gen_adopted;
    wire        status_pending;
    wire [31:0] sh_perm_lo [MAX_PORTS-1:0];
    wire [31:0] sh_perm_hi [MAX_PORTS-1:0];
    wire [7:0]  sh_weight [MAX_PORTS-1:0];
    wire [31:0] sh_rate [MAX_PORTS-1:0];
    wire [23:0] sh_burst [MAX_PORTS-1:0];
    wire        sh_enable [MAX_PORTS-1:0];
    wire [15:0] sh_keys [MAX_PORTS-1:0];
    wire [15:0] hw_active_gen [MAX_PORTS-1:0];
    wire [31:0] hw_cnt_pkts [MAX_PORTS-1:0];
    wire [31:0] hw_cnt_flits [MAX_PORTS-1:0];
    wire [31:0] hw_cnt_drops [MAX_PORTS-1:0];
    wire [31:0] hw_cnt_stalls [MAX_PORTS-1:0];

    slicefab_xbar_regs regs (
        .clk(clk), .rst(rst),
        .s_cpuif_req(cpuif_req), .s_cpuif_req_is_wr(cpuif_req_is_wr),
        .s_cpuif_addr(cpuif_addr), .s_cpuif_wr_data(cpuif_wr_data),
        .s_cpuif_wr_biten(cpuif_wr_biten),
        .s_cpuif_req_stall_wr(cpuif_req_stall_wr), .s_cpuif_req_stall_rd(cpuif_req_stall_rd),
        .s_cpuif_rd_ack(cpuif_rd_ack), .s_cpuif_rd_err(cpuif_rd_err),
        .s_cpuif_rd_data(cpuif_rd_data), .s_cpuif_wr_ack(cpuif_wr_ack),
        .s_cpuif_wr_err(cpuif_wr_err),
        .hwif_in_caps_n_ports(8'(N_PORTS)),
        .hwif_in_caps_n_keys(8'(N_KEYS)),
        .hwif_in_caps_data_bytes(8'(DATA_BYTES)),
        .hwif_out_ctrl_commit(ctrl_commit),
        .hwif_out_ctrl_clear_counters(ctrl_clear_counters),
        .hwif_in_gen_committed(gen_committed),
        .hwif_in_gen_adopted(gen_adopted),
        .hwif_in_status_pending(status_pending),
        .hwif_out_port_perm_lo_allowed(sh_perm_lo),
        .hwif_out_port_perm_hi_allowed(sh_perm_hi),
        .hwif_out_port_weight(sh_weight),
        .hwif_out_port_tb_rate_rate(sh_rate),
        .hwif_out_port_tb_burst_burst(sh_burst),
        .hwif_out_port_tb_burst_enable(sh_enable),
        .hwif_out_port_keys_mask(sh_keys),
        .hwif_in_port_active_gen_gen(hw_active_gen),
        .hwif_in_port_cnt_pkts_count(hw_cnt_pkts),
        .hwif_in_port_cnt_flits_count(hw_cnt_flits),
        .hwif_in_port_cnt_drops_count(hw_cnt_drops),
        .hwif_in_port_cnt_stalls_count(hw_cnt_stalls)
    );

    // ------------------------------------------------------------------------------------
    // per-input state
    // ------------------------------------------------------------------------------------
    // ACTIVE configuration (the one packets are routed, checked and shaped under) and
    // STAGED one (copied from the shadow registers at CTRL.commit)
    reg [CFG_WIDTH-1:0]   act_cfg [N_PORTS-1:0];
    reg [CFG_WIDTH-1:0]   stg_cfg [N_PORTS-1:0];
    reg                   stg_valid [N_PORTS-1:0];
    // the fields of act_cfg
    wire [MAX_PORTS-1:0]  act_perm [N_PORTS-1:0];
    wire [15:0]           act_keys [N_PORTS-1:0];
    wire [7:0]            act_weight [N_PORTS-1:0];
    wire [31:0]           act_rate [N_PORTS-1:0];
    wire [23:0]           act_burst [N_PORTS-1:0];
    wire                  act_enable [N_PORTS-1:0];
    wire [15:0]           act_gen [N_PORTS-1:0];
    // packet in flight: busy, dropped (drained) or forwarded to `sel`
    reg [N_PORTS-1:0]     busy;
    reg [N_PORTS-1:0]     dropping;
    reg [IDX_WIDTH-1:0]   sel [N_PORTS-1:0];
    reg [TOKEN_WIDTH-1:0] tokens [N_PORTS-1:0];
    reg [31:0]            cnt_pkts [N_PORTS-1:0];
    reg [31:0]            cnt_flits [N_PORTS-1:0];
    reg [31:0]            cnt_drops [N_PORTS-1:0];
    reg [31:0]            cnt_stalls [N_PORTS-1:0];

    reg [15:0] committed;

    // per-input combinational results
    wire [N_PORTS-1:0]    in_req;        // requests the output named by its head flit
    wire [N_PORTS-1:0]    in_drop_start; // head packet dropped this cycle
    wire [N_PORTS-1:0]    in_cont;       // moves the next flit of its packet in flight
    wire [N_PORTS-1:0]    in_granted;    // head packet granted: first flit moves now
    wire [N_PORTS-1:0]    in_busy_next;
    wire [SEL_WIDTH-1:0]  in_dest [N_PORTS-1:0];

    // per-output
    wire [N_PORTS-1:0]    out_ready;     // the output register can take a flit
    wire [N_PORTS-1:0]    out_grant;     // the output grants a head packet this cycle

    // grant_onehot[o * N_PORTS + i]: output o grants input i this cycle
    wire [N_PORTS*N_PORTS-1:0] grant_onehot;

    function automatic [8:0] popcount(input [KEEP_WIDTH-1:0] keep);
        integer b;
        begin
            popcount = 9'd0;
            for (b = 0; b < KEEP_WIDTH; b = b + 1) popcount = popcount + {8'd0, keep[b]};
        end
    endfunction

    genvar gi, go, gj;
    generate
        for (gi = 0; gi < N_PORTS; gi = gi + 1) begin : g_in
            wire [SEL_WIDTH-1:0]  dest = s_axis_tdest[gi*DEST_WIDTH +: SEL_WIDTH];
            wire [3:0]            key = s_axis_tuser[gi*USER_WIDTH +: 4];
            wire                  valid = s_axis_tvalid[gi];
            wire                  last = s_axis_tlast[gi];
            wire [8:0]            nbytes = popcount(s_axis_tkeep[gi*KEEP_WIDTH +: KEEP_WIDTH]);
            assign {act_perm[gi], act_keys[gi], act_weight[gi], act_rate[gi], act_burst[gi],
                    act_enable[gi], act_gen[gi]} = act_cfg[gi];
            // the shadow registers as the configuration of the generation a commit creates
            wire [CFG_WIDTH-1:0]  committing = {
                {sh_perm_hi[gi], sh_perm_lo[gi]} & OUT_EXISTS,
                sh_keys[gi] & KEY_EXISTS,
                (sh_weight[gi] == 8'd0) ? 8'd1 : sh_weight[gi],
                sh_rate[gi],
                sh_burst[gi],
                sh_enable[gi],
                committed + 16'd1
            };
            // 1. refill (computed every cycle; the register keeps the post-transfer value)
            wire [TOKEN_WIDTH:0]  sum = {1'b0, tokens[gi]} + {{(TOKEN_WIDTH-31){1'b0}}, act_rate[gi]};
            wire [TOKEN_WIDTH-1:0] cap = {act_burst[gi], {TOKEN_SHIFT{1'b0}}};
            wire [TOKEN_WIDTH-1:0] refilled = (sum > {1'b0, cap}) ? cap : sum[TOKEN_WIDTH-1:0];
            wire [TOKEN_WIDTH-1:0] cost = {{(TOKEN_WIDTH-TOKEN_SHIFT-9){1'b0}}, nbytes,
                                           {TOKEN_SHIFT{1'b0}}};
            wire                  has_tokens = !act_enable[gi] || refilled >= cost;
            // 2. head inspection under the ACTIVE configuration
            wire                  dest_ok = ({26'd0, dest} < N_PORTS) && act_perm[gi][dest];
            wire                  key_ok = ({28'd0, key} < N_KEYS) && act_keys[gi][key];
            wire                  at_head = !busy[gi] && valid;
            assign in_dest[gi] = dest;
            assign in_drop_start[gi] = at_head && !(dest_ok && key_ok);
            assign in_req[gi] = at_head && dest_ok && key_ok && has_tokens;
            // 3. granted by the output its head flit names
            wire [N_PORTS-1:0]    grant_column;
            genvar gk;
            for (gk = 0; gk < N_PORTS; gk = gk + 1) begin : g_col
                assign grant_column[gk] = grant_onehot[gk*N_PORTS + gi];
            end
            assign in_granted[gi] = |grant_column;
            // 4. transfer
            wire fwd_ready = busy[gi] && !dropping[gi] && has_tokens && out_ready[sel[gi]];
            assign in_cont[gi] = fwd_ready && valid;
            wire drain = busy[gi] && dropping[gi];
            assign s_axis_tready[gi] = in_granted[gi] || fwd_ready || in_drop_start[gi] || drain;
            wire consumed = valid && s_axis_tready[gi];
            wire moved = in_granted[gi] || in_cont[gi];  // forwarded (not drained)
            wire stall = valid && !has_tokens &&
                         (busy[gi] ? !dropping[gi] : (dest_ok && key_ok));
            assign in_busy_next[gi] = busy[gi] ? !(consumed && last) : (consumed && !last);
            // 5. adoption at the packet boundary after this cycle
            wire adopt = (ctrl_commit || stg_valid[gi]) && !in_busy_next[gi];

            always @(posedge clk) begin
                if (rst) begin
                    act_cfg[gi] <= CFG_RESET;
                    stg_cfg[gi] <= CFG_RESET;
                    stg_valid[gi] <= 1'b0;
                    busy[gi] <= 1'b0;
                    dropping[gi] <= 1'b0;
                    sel[gi] <= {IDX_WIDTH{1'b0}};
                    tokens[gi] <= {TOKEN_WIDTH{1'b0}};
                    cnt_pkts[gi] <= 32'd0;
                    cnt_flits[gi] <= 32'd0;
                    cnt_drops[gi] <= 32'd0;
                    cnt_stalls[gi] <= 32'd0;
                end else begin
                    // tokens: refilled, minus the bytes of a forwarded flit
                    tokens[gi] <= (moved && act_enable[gi]) ? refilled - cost : refilled;
                    busy[gi] <= in_busy_next[gi];
                    if (!busy[gi] && consumed) begin
                        dropping[gi] <= in_drop_start[gi];
                        sel[gi] <= dest[IDX_WIDTH-1:0];
                    end
                    // counters (CTRL.clear_counters wins: it comes after this cycle)
                    if (ctrl_clear_counters) begin
                        cnt_pkts[gi] <= 32'd0;
                        cnt_flits[gi] <= 32'd0;
                        cnt_drops[gi] <= 32'd0;
                        cnt_stalls[gi] <= 32'd0;
                    end else begin
                        if (moved && last) cnt_pkts[gi] <= cnt_pkts[gi] + 32'd1;
                        if (moved) cnt_flits[gi] <= cnt_flits[gi] + 32'd1;
                        if (in_drop_start[gi]) cnt_drops[gi] <= cnt_drops[gi] + 32'd1;
                        if (stall) cnt_stalls[gi] <= cnt_stalls[gi] + 32'd1;
                    end
                    // commit: stage the shadow registers; adopt at the packet boundary
                    if (ctrl_commit) stg_cfg[gi] <= committing;
                    if (adopt) begin
                        stg_valid[gi] <= 1'b0;
                        act_cfg[gi] <= ctrl_commit ? committing : stg_cfg[gi];
                    end else if (ctrl_commit) begin
                        stg_valid[gi] <= 1'b1;
                    end
                end
            end

            assign hw_active_gen[gi] = act_gen[gi];
            assign hw_cnt_pkts[gi] = cnt_pkts[gi];
            assign hw_cnt_flits[gi] = cnt_flits[gi];
            assign hw_cnt_drops[gi] = cnt_drops[gi];
            assign hw_cnt_stalls[gi] = cnt_stalls[gi];
        end

        // ports the map has but this instance does not: their accesses fail in the front end
        for (gi = N_PORTS; gi < MAX_PORTS; gi = gi + 1) begin : g_absent
            assign hw_active_gen[gi] = 16'd0;
            assign hw_cnt_pkts[gi] = 32'd0;
            assign hw_cnt_flits[gi] = 32'd0;
            assign hw_cnt_drops[gi] = 32'd0;
            assign hw_cnt_stalls[gi] = 32'd0;
        end
    endgenerate

    // ------------------------------------------------------------------------------------
    // per-output arbitration, multiplexing and output register
    // ------------------------------------------------------------------------------------
    generate
        for (go = 0; go < N_PORTS; go = go + 1) begin : g_out
            reg                 own_valid;   // the output carries a packet (after its 1st flit)
            reg [IDX_WIDTH-1:0] owner;
            reg [IDX_WIDTH-1:0] last_grant;  // input granted last
            reg [7:0]           run;         // consecutive grants of its turn (0: none)
            reg [N_PORTS-1:0]   requests;
            reg [IDX_WIDTH-1:0] winner;
            reg                 found, keep_turn;
            integer             i, k, cand;

            // weighted round-robin (WEIGHT register semantics; model._OutputArbiter)
            always @(*) begin
                for (i = 0; i < N_PORTS; i = i + 1)
                    requests[i] = in_req[i] && in_dest[i] == go[SEL_WIDTH-1:0];
                keep_turn = requests[last_grant] && run != 8'd0 &&
                            run < act_weight[last_grant];
                winner = last_grant;
                found = keep_turn;
                for (k = 1; k <= N_PORTS; k = k + 1) begin
                    cand = {{(32-IDX_WIDTH){1'b0}}, last_grant} + k;
                    if (cand >= N_PORTS) cand = cand - N_PORTS;
                    if (!found && requests[cand]) begin
                        winner = cand[IDX_WIDTH-1:0];
                        found = 1'b1;
                    end
                end
            end

            assign out_grant[go] = found && !own_valid && out_ready[go];
            for (gj = 0; gj < N_PORTS; gj = gj + 1) begin : g_onehot
                assign grant_onehot[go*N_PORTS + gj] = out_grant[go] && winner == gj;
            end

            // the input this output listens to: its owner, else the input it grants now
            wire [IDX_WIDTH-1:0] src = own_valid ? owner : winner;
            wire                 push = own_valid ? in_cont[owner] : out_grant[go];
            wire [CHAN_WIDTH-1:0] chan = {
                s_axis_tdata[src*DATA_WIDTH +: DATA_WIDTH],
                s_axis_tkeep[src*KEEP_WIDTH +: KEEP_WIDTH],
                s_axis_tlast[src],
                s_axis_tid[src*ID_WIDTH +: ID_WIDTH],
                s_axis_tdest[src*DEST_WIDTH +: DEST_WIDTH],
                s_axis_tuser[src*USER_WIDTH +: USER_WIDTH]
            };
            wire [CHAN_WIDTH-1:0] out_chan;

            always @(posedge clk) begin
                if (rst) begin
                    last_grant <= LAST_PORT;
                    run <= 8'd0;
                    own_valid <= 1'b0;
                    owner <= {IDX_WIDTH{1'b0}};
                end else begin
                    if (out_grant[go]) begin
                        if (keep_turn) begin
                            run <= run + 8'd1;
                        end else begin
                            last_grant <= winner;
                            run <= 8'd1;
                        end
                        // a one-flit packet leaves the output free for the next cycle
                        own_valid <= !s_axis_tlast[winner];
                        owner <= winner;
                    end else if (own_valid && push && s_axis_tlast[owner]) begin
                        own_valid <= 1'b0;
                    end
                end
            end

            slicefab_xbar_skid #(.WIDTH(CHAN_WIDTH)) out_reg (
                .clk(clk), .rst(rst),
                .in_data(chan), .in_valid(push), .in_ready(out_ready[go]),
                .out_data(out_chan), .out_valid(m_axis_tvalid[go]), .out_ready(m_axis_tready[go])
            );
            assign {
                m_axis_tdata[go*DATA_WIDTH +: DATA_WIDTH],
                m_axis_tkeep[go*KEEP_WIDTH +: KEEP_WIDTH],
                m_axis_tlast[go],
                m_axis_tid[go*ID_WIDTH +: ID_WIDTH],
                m_axis_tdest[go*DEST_WIDTH +: DEST_WIDTH],
                m_axis_tuser[go*USER_WIDTH +: USER_WIDTH]
            } = out_chan;
        end
    endgenerate

    // ------------------------------------------------------------------------------------
    // generations: GEN.committed, GEN.adopted, STATUS.pending
    // ------------------------------------------------------------------------------------
    reg [15:0]          max_lag;
    reg [N_PORTS-1:0]   pending_ports;
    integer p;
    always @(*) begin
        max_lag = 16'd0;
        for (p = 0; p < N_PORTS; p = p + 1) begin
            pending_ports[p] = stg_valid[p];
            if (stg_valid[p] && committed - act_gen[p] > max_lag) max_lag = committed - act_gen[p];
        end
    end
    assign gen_committed = committed;
    assign gen_adopted = committed - max_lag;
    assign status_pending = |pending_ports;

    always @(posedge clk) begin
        if (rst) committed <= 16'd0;
        else if (ctrl_commit) committed <= committed + 16'd1;
    end

    // The shadow registers of ports >= N_PORTS (the map has 64) are left unconnected: the
    // front end refuses every access to them, so they keep their reset values.
endmodule

`default_nettype wire
